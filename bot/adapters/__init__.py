"""Platform edges. Each translates its platform to `Incoming` and renders engine events."""
