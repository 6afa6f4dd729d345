"""the agent wire is mutual TLS: hosts' and backup storages' agent URLs become https

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 01:30:00.000000
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("host", "backup_storage"):
        op.execute(f"UPDATE {table} SET \"agentUrl\" = 'https://' || substr(\"agentUrl\", 8) "
                   "WHERE \"agentUrl\" LIKE 'http://%'")


def downgrade() -> None:
    for table in ("host", "backup_storage"):
        op.execute(f"UPDATE {table} SET \"agentUrl\" = 'http://' || substr(\"agentUrl\", 9) "
                   "WHERE \"agentUrl\" LIKE 'https://%'")
