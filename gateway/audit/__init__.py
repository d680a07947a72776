"""The signed, hash-chained, append-only audit log (SPEC §8): record, writer, verify, tail."""
