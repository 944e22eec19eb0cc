"""Grafana provisioning for the telemetry service.

`grafana/build.py` is the one source of every file under `grafana/provisioning`
and `grafana/dashboards`; `python -m grafana.build` rewrites them and a test
(tests/test_grafana.py) fails when the committed files are not what it writes.
"""
