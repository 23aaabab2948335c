"""Before any tensor is read: pairing and actions, preflight checks, budgets and how each tensor runs."""
