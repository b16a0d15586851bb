"""A device as paho-mqtt sees it, for the broker's gate tests.

Usage: paho_client.py JSON, where JSON holds host, port, protocol (4 or 5),
client_id, optional username/password, optional tls {ca, cert, key}, and
steps: a list of ["publish", topic, hex_payload] or ["subscribe", [filters]].
Prints one JSON object: the CONNACK reason, each step's outcome (PUBACK
reason code, SUBACK codes, or "disconnected"), and whether the broker closed
the connection.
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

spec = json.loads(sys.argv[1])
v5 = spec["protocol"] == 5
client = mqtt.Client(
    callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
    client_id=spec["client_id"],
    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
)
if spec.get("username") is not None:
    client.username_pw_set(spec["username"], spec.get("password"))
if spec.get("tls"):
    t = spec["tls"]
    client.tls_set(ca_certs=t["ca"], certfile=t.get("cert"), keyfile=t.get("key"))

result = {"connack": None, "steps": [], "disconnected": False}
connected = threading.Event()
done = threading.Event()
disconnected = threading.Event()
pending = {}


def on_connect(c, userdata, flags, reason_code, properties):
    result["connack"] = str(reason_code)
    result["connack_failure"] = reason_code.is_failure
    connected.set()


def on_disconnect(c, userdata, flags, reason_code, properties):
    result["disconnected"] = True
    disconnected.set()
    connected.set()


def on_publish(c, userdata, mid, reason_code, properties):
    pending[mid] = str(reason_code)
    done.set()


def on_subscribe(c, userdata, mid, reason_codes, properties):
    pending[mid] = [rc.value for rc in reason_codes]
    done.set()


client.on_connect = on_connect
client.on_disconnect = on_disconnect
client.on_publish = on_publish
client.on_subscribe = on_subscribe
try:
    client.connect(spec["host"], spec["port"], keepalive=30)
except Exception as e:  # noqa: BLE001 - reported to the test
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
client.loop_start()
connected.wait(10)
if result["connack"] is not None and not result.get("connack_failure"):
    for step in spec["steps"]:
        done.clear()
        if step[0] == "publish":
            info = client.publish(step[1], bytes.fromhex(step[2]), qos=1)
        else:
            info = client.subscribe([(f, 1) for f in step[1]])
            info = type("I", (), {"mid": info[1]})
        deadline = time.time() + 5
        while info.mid not in pending and time.time() < deadline:
            if disconnected.is_set():
                break
            done.wait(0.1)
        if info.mid in pending:
            result["steps"].append(pending[info.mid])
        elif disconnected.is_set():
            result["steps"].append("disconnected")
            break
        else:
            result["steps"].append("no answer")
    time.sleep(0.2)
client.disconnect()
client.loop_stop()
print(json.dumps(result))
