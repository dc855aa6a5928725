#!/bin/sh
# Write Mosquitto's password file from the environment, then run the broker.
#
# The twin logs in as "mgtwin" (MQTT_TWIN_PASSWORD); the emulator as its site's identifier
# (SITE, MQTT_EMULATOR_PASSWORD), which the ACL's patterns use to confine it to its own site.
# The file is rebuilt at every start, so changing a password in .env and restarting is enough.
set -eu
: "${SITE:?set SITE in .env}"
: "${MQTT_TWIN_PASSWORD:?set MQTT_TWIN_PASSWORD in .env}"
: "${MQTT_EMULATOR_PASSWORD:?set MQTT_EMULATOR_PASSWORD in .env}"
passwd="${MOSQUITTO_PASSWORD_FILE:-/mosquitto/data/passwd}"
umask 077
rm -f "$passwd"
mosquitto_passwd -c -b "$passwd" mgtwin "$MQTT_TWIN_PASSWORD"
mosquitto_passwd -b "$passwd" "$SITE" "$MQTT_EMULATOR_PASSWORD"
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$passwd"
fi
exec mosquitto -c "${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}"
