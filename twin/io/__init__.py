"""The boundaries: MQTT, InfluxDB, replay and recording (the only places third-party I/O libraries are imported)."""
