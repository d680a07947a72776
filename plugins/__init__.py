"""Plugins shipped with access-gateway (SPEC §9); the first ones arrive with the audit log."""
