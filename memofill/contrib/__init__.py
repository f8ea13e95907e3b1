"""Optional integrations, each behind an extra; ``import memofill`` imports none of them."""
