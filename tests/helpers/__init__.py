"""What the tests share: tiny models, fault injection, uptraining runs, hub caches."""
