"""The gateway's own endpoints under /.gateway/ (SPEC §12)."""
