"""indexes used_ip (l3NetworkUuid, usedFor), the DHCP server IP lookup of every VM start, and
vm_instance (hostUuid, state), the Running VMs of one host

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:00:00.000000
"""

from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("used_ip", schema=None) as batch_op:
        batch_op.create_index("ix_used_ip_l3_used_for", ["l3NetworkUuid", "usedFor"], unique=False)
    with op.batch_alter_table("vm_instance", schema=None) as batch_op:
        batch_op.create_index("ix_vm_instance_host_state", ["hostUuid", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("vm_instance", schema=None) as batch_op:
        batch_op.drop_index("ix_vm_instance_host_state")
    with op.batch_alter_table("used_ip", schema=None) as batch_op:
        batch_op.drop_index("ix_used_ip_l3_used_for")
