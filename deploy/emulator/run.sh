#!/bin/sh
# The compose stack's emulator: the packaged scenario, starting now (--start now), published live
# at real time. Restarted by compose when the run ends.
set -eu
exec mgtwin emulate --scenario "${EMULATOR_SCENARIO:-nevada}" --start now --speed 1 \
    --duration "${EMULATOR_DURATION:-7d}" --mqtt "${EMULATOR_MQTT_URL:-mqtt://mosquitto:1883}" "$@"
