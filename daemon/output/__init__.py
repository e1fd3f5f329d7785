"""Everything between the provider's bytes and the file placed in the outbox."""
