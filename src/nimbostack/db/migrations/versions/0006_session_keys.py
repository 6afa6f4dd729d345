"""sessions are kept by the SHA-256 of their token, no longer by the token itself: the sessions
made before (keyed by their plain tokens) are dropped, and their holders log in again

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:00:00.000000
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM session")


def downgrade() -> None:
    op.execute("DELETE FROM session")
