"""Code the tests share: servers, stampedes, fault helpers, strategies. No test lives here."""
