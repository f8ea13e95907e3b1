"""A Django site whose book records come from a slow catalogue, cached with memofill."""
