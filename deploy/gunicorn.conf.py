"""Gunicorn settings for the Keyvault web process (``gunicorn -c deploy/gunicorn.conf.py``).

Every value can be changed with an ``HMD_*`` variable; see docs/ops/production.md.
TLS ends at the reverse proxy in front; set HMD_FORWARDED_ALLOW_IPS to its address
and HMD_SECURE_PROXY_SSL_HEADER so Django knows the request came over HTTPS.
"""

import multiprocessing
import os

wsgi_app = "keyvault.wsgi:application"
bind = os.environ.get("HMD_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("HMD_WEB_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 8)))
threads = int(os.environ.get("HMD_WEB_THREADS", "4"))
worker_class = "gthread"
timeout = int(os.environ.get("HMD_WEB_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
# Recycle workers now and then, so a slow leak never grows without bound.
max_requests = int(os.environ.get("HMD_WEB_MAX_REQUESTS", "2000"))
max_requests_jitter = max_requests // 10
forwarded_allow_ips = os.environ.get("HMD_FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = "-"
errorlog = "-"
# No request bodies or query strings with secrets go to the access log: the console posts forms.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms "%(a)s"'
limit_request_line = 8190
limit_request_fields = 100
# No runtime control socket: it is a shared path under $HOME and nobody needs it here.
control_socket_disable = True
