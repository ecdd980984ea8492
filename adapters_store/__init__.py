"""Adapter formats, validation and the tiered adapter cache (filled in by the multi-adapter work)."""
