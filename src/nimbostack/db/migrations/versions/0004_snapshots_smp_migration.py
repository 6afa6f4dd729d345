"""volume snapshots, pooled primary storage capacity (SharedMountPoint), host CPU model

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 09:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('primary_storage_resource_ref',
    sa.Column('resourceUuid', sa.String(length=32), nullable=False),
    sa.Column('primaryStorageUuid', sa.String(length=32), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('resourceType', sa.String(length=64), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('resourceUuid')
    )
    with op.batch_alter_table('primary_storage_resource_ref', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_primary_storage_resource_ref_primaryStorageUuid'),
                              ['primaryStorageUuid'], unique=False)

    op.create_table('volume_snapshot_tree',
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('volumeUuid', sa.String(length=32), nullable=False),
    sa.Column('current', sa.Boolean(), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('volume_snapshot_tree', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_volume_snapshot_tree_volumeUuid'), ['volumeUuid'], unique=False)

    op.create_table('volume_snapshot',
    sa.Column('volumeUuid', sa.String(length=32), nullable=False),
    sa.Column('treeUuid', sa.String(length=32), nullable=True),
    sa.Column('parentUuid', sa.String(length=32), nullable=True),
    sa.Column('primaryStorageUuid', sa.String(length=32), nullable=True),
    sa.Column('primaryStorageInstallPath', sa.String(length=2048), nullable=True),
    sa.Column('volumeType', sa.String(length=16), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('latest', sa.Boolean(), nullable=False),
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.String(length=2048), nullable=True),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('volume_snapshot', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_volume_snapshot_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_volume_snapshot_primaryStorageUuid'), ['primaryStorageUuid'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_volume_snapshot_volumeUuid'), ['volumeUuid'], unique=False)

    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cpuModel', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.drop_column('cpuModel')

    with op.batch_alter_table('volume_snapshot', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_volume_snapshot_volumeUuid'))
        batch_op.drop_index(batch_op.f('ix_volume_snapshot_primaryStorageUuid'))
        batch_op.drop_index(batch_op.f('ix_volume_snapshot_name'))
    op.drop_table('volume_snapshot')

    with op.batch_alter_table('volume_snapshot_tree', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_volume_snapshot_tree_volumeUuid'))
    op.drop_table('volume_snapshot_tree')

    with op.batch_alter_table('primary_storage_resource_ref', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_primary_storage_resource_ref_primaryStorageUuid'))
    op.drop_table('primary_storage_resource_ref')
