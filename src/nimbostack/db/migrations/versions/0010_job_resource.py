"""job.resourceUuid: what a creation makes, so that recovery answers an orphaned job by its outcome

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 02:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job", sa.Column("resourceUuid", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("resourceUuid")
