"""identity: users, user groups, policies and their attachments, per-account quotas, shared resources
(issue 13 item 9); every existing normal account gets ZStack's default quotas

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 04:01:45.603107
"""
import uuid

import sqlalchemy as sa
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('identity_shared_resource',
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('ownerAccountUuid', sa.String(length=32), nullable=False),
    sa.Column('receiverAccountUuid', sa.String(length=32), nullable=True),
    sa.Column('toPublic', sa.Boolean(), nullable=False),
    sa.Column('resourceType', sa.String(length=64), nullable=False),
    sa.Column('resourceUuid', sa.String(length=32), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('identity_shared_resource', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_shared_resource_ownerAccountUuid'), ['ownerAccountUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_shared_resource_receiverAccountUuid'), ['receiverAccountUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_shared_resource_resourceUuid'), ['resourceUuid'], unique=False)

    op.create_table('identity_policy',
    sa.Column('accountUuid', sa.String(length=32), nullable=False),
    sa.Column('statements', sa.Text(), nullable=False),
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.String(length=2048), nullable=True),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['accountUuid'], ['account.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('identity_policy', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_policy_accountUuid'), ['accountUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_policy_name'), ['name'], unique=False)

    op.create_table('identity_quota',
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('identityUuid', sa.String(length=32), nullable=False),
    sa.Column('identityType', sa.String(length=32), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['identityUuid'], ['account.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('uuid'),
    sa.UniqueConstraint('identityUuid', 'name')
    )
    with op.batch_alter_table('identity_quota', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_quota_identityUuid'), ['identityUuid'], unique=False)

    op.create_table('identity_user',
    sa.Column('accountUuid', sa.String(length=32), nullable=False),
    sa.Column('passwordHash', sa.String(length=255), nullable=False),
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.String(length=2048), nullable=True),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['accountUuid'], ['account.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('uuid'),
    sa.UniqueConstraint('accountUuid', 'name')
    )
    with op.batch_alter_table('identity_user', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_user_accountUuid'), ['accountUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_user_name'), ['name'], unique=False)

    op.create_table('identity_user_group',
    sa.Column('accountUuid', sa.String(length=32), nullable=False),
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.String(length=2048), nullable=True),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['accountUuid'], ['account.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('identity_user_group', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_user_group_accountUuid'), ['accountUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_user_group_name'), ['name'], unique=False)

    op.create_table('identity_user_group_policy_ref',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('groupUuid', sa.String(length=32), nullable=False),
    sa.Column('policyUuid', sa.String(length=32), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['groupUuid'], ['identity_user_group.uuid'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['policyUuid'], ['identity_policy.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('groupUuid', 'policyUuid')
    )
    with op.batch_alter_table('identity_user_group_policy_ref', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_user_group_policy_ref_groupUuid'), ['groupUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_user_group_policy_ref_policyUuid'), ['policyUuid'], unique=False)

    op.create_table('identity_user_group_user_ref',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('userUuid', sa.String(length=32), nullable=False),
    sa.Column('groupUuid', sa.String(length=32), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['groupUuid'], ['identity_user_group.uuid'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['userUuid'], ['identity_user.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('userUuid', 'groupUuid')
    )
    with op.batch_alter_table('identity_user_group_user_ref', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_user_group_user_ref_groupUuid'), ['groupUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_user_group_user_ref_userUuid'), ['userUuid'], unique=False)

    op.create_table('identity_user_policy_ref',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('userUuid', sa.String(length=32), nullable=False),
    sa.Column('policyUuid', sa.String(length=32), nullable=False),
    sa.Column('createDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('lastOpDate', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['policyUuid'], ['identity_policy.uuid'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['userUuid'], ['identity_user.uuid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('userUuid', 'policyUuid')
    )
    with op.batch_alter_table('identity_user_policy_ref', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identity_user_policy_ref_policyUuid'), ['policyUuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_identity_user_policy_ref_userUuid'), ['userUuid'], unique=False)
    _default_quotas()


# ZStack 1.2's defaults for a normal account, as core/quota.py had them when this revision was written
_DEFAULTS = {
    "vm.num": 20, "vm.cpuNum": 80, "vm.memorySize": 80 << 30, "volume.data.num": 40, "volume.capacity": 10 << 40,
    "l3.num": 20, "securityGroup.num": 20, "vip.num": 20, "eip.num": 20, "portForwarding.num": 20,
}


def _default_quotas() -> None:
    conn = op.get_bind()
    account = sa.table("account", sa.column("uuid"), sa.column("type"))
    quota = sa.table(
        "identity_quota", sa.column("uuid"), sa.column("name"), sa.column("identityUuid"),
        sa.column("identityType"), sa.column("value"),
    )
    normal = conn.execute(sa.select(account.c.uuid).where(account.c.type != "SystemAdmin")).scalars().all()
    rows = [
        {"uuid": uuid.uuid4().hex, "name": n, "identityUuid": a, "identityType": "AccountVO", "value": v}
        for a in normal
        for n, v in _DEFAULTS.items()
    ]
    if rows:
        op.bulk_insert(quota, rows)


def downgrade() -> None:
    with op.batch_alter_table('identity_user_policy_ref', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_user_policy_ref_userUuid'))
        batch_op.drop_index(batch_op.f('ix_identity_user_policy_ref_policyUuid'))

    op.drop_table('identity_user_policy_ref')
    with op.batch_alter_table('identity_user_group_user_ref', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_user_group_user_ref_userUuid'))
        batch_op.drop_index(batch_op.f('ix_identity_user_group_user_ref_groupUuid'))

    op.drop_table('identity_user_group_user_ref')
    with op.batch_alter_table('identity_user_group_policy_ref', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_user_group_policy_ref_policyUuid'))
        batch_op.drop_index(batch_op.f('ix_identity_user_group_policy_ref_groupUuid'))

    op.drop_table('identity_user_group_policy_ref')
    with op.batch_alter_table('identity_user_group', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_user_group_name'))
        batch_op.drop_index(batch_op.f('ix_identity_user_group_accountUuid'))

    op.drop_table('identity_user_group')
    with op.batch_alter_table('identity_user', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_user_name'))
        batch_op.drop_index(batch_op.f('ix_identity_user_accountUuid'))

    op.drop_table('identity_user')
    with op.batch_alter_table('identity_quota', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_quota_identityUuid'))

    op.drop_table('identity_quota')
    with op.batch_alter_table('identity_policy', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_policy_name'))
        batch_op.drop_index(batch_op.f('ix_identity_policy_accountUuid'))

    op.drop_table('identity_policy')
    with op.batch_alter_table('identity_shared_resource', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_identity_shared_resource_resourceUuid'))
        batch_op.drop_index(batch_op.f('ix_identity_shared_resource_receiverAccountUuid'))
        batch_op.drop_index(batch_op.f('ix_identity_shared_resource_ownerAccountUuid'))

    op.drop_table('identity_shared_resource')
