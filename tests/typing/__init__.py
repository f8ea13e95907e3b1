"""What a type checker sees of memofill's API, and the typed values the tests round-trip."""
