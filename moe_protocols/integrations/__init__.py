"""Integrations with serving engines; each subpackage imports its engine, nothing else does."""
