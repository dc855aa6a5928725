#!/bin/sh
# The compose stack's emulator: the packaged scenario, starting now, published live at real time.
# `mgtwin emulate --scenario nevada --speed 1` would stamp the packaged start date (2025-07-01);
# live_scenario.py makes a copy that starts now. Restarted by compose when the run ends.
set -eu
scenario=$(python /opt/mgtwin/deploy/emulator/live_scenario.py "${EMULATOR_SCENARIO:-nevada}")
exec mgtwin emulate --scenario "$scenario" --speed 1 --duration "${EMULATOR_DURATION:-7d}" \
    --mqtt "${EMULATOR_MQTT_URL:-mqtt://mosquitto:1883}" "$@"
