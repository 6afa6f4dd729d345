"""management_node: the management nodes on this database, with their heartbeats
(QueryManagementNode, IsReadyToGo)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "management_node",
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("hostName", sa.String(length=255), nullable=False),
        sa.Column("joinDate", sa.DateTime(), nullable=False),
        sa.Column("heartBeat", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    with op.batch_alter_table("management_node", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_management_node_heartBeat"), ["heartBeat"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("management_node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_management_node_heartBeat"))
    op.drop_table("management_node")
