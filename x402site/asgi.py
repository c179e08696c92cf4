"""The ASGI application (uvicorn; docs/deploy.md): every route, one server.

Async views (the prediction streams and ``Prefer: wait``, predictions/streams.py) wait on the
event loop, so a listener holds no worker thread; sync views run in threads as under WSGI. In
debug (the quick start) static files are served here too, as runserver would.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")
application = get_asgi_application()

from django.conf import settings  # noqa: E402 (configured by the call above)

if settings.DEBUG:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
