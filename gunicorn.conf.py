# gunicorn picks this file up from the working directory; the settings live in
# the package so that an installed `telemetry serve` uses the same ones.
from api.gunicorn_conf import *  # noqa: F403
from api.gunicorn_conf import on_starting  # noqa: F401
