"""Fake credentials the redaction tests look for wherever they could leak (output, MLflow params/tags)."""
import json

PW = "pw-7Hq2LmX9"
KEY, SECRET = "AKIAVAEPIPETEST", "S3cr3t-Zk4sWq8Pd"
OPTIONS = json.dumps({"key": KEY, "secret": SECRET, "anon": False})
