"""Pack and site emulators: the source of telemetry and of truth for the twin."""
