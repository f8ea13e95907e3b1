"""pytest plugin: fixtures and helpers for testing functions cached with memofill."""
