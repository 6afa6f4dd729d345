"""console_proxy_agent and console_proxy: the management node's console proxy and the one-time
tokens RequestConsoleAccess grants (QueryConsoleProxyAgent, ReconnectConsoleProxyAgent)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_proxy_agent",
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("managementIp", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=2048), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("createDate", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_table(
        "console_proxy",
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("vmInstanceUuid", sa.String(length=32), nullable=False),
        sa.Column("tokenHash", sa.String(length=64), nullable=False),
        sa.Column("agentUuid", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("expireDate", sa.DateTime(), nullable=False),
        sa.Column("createDate", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
        sa.UniqueConstraint("tokenHash"),
    )
    with op.batch_alter_table("console_proxy", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_console_proxy_expireDate"), ["expireDate"], unique=False)
        batch_op.create_index(batch_op.f("ix_console_proxy_vmInstanceUuid"), ["vmInstanceUuid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("console_proxy", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_console_proxy_vmInstanceUuid"))
        batch_op.drop_index(batch_op.f("ix_console_proxy_expireDate"))
    op.drop_table("console_proxy")
    op.drop_table("console_proxy_agent")
