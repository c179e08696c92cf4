from django.contrib import admin
from django.urls import include, path
from drf_spectacular.renderers import OpenApiJsonRenderer
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from payments.channels.views import ChannelRefund
from predictions.views import CogWebhook, DiscoveryResources

from . import ops

urlpatterns = [
    path("openapi.json", SpectacularAPIView.as_view(renderer_classes=[OpenApiJsonRenderer]), name="openapi"),
    path("docs", SpectacularSwaggerView.as_view(url_name="openapi"), name="swagger-ui"),
    path("redoc", SpectacularRedocView.as_view(url_name="openapi"), name="redoc"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("v1/channels/refund", ChannelRefund.as_view(), name="channel-refund"),
    path("v1/", include("predictions.urls")),
    path("facilitator/", include("payments.urls")),
    path("mcp", include("mcpserver.urls")),
    path("discovery/resources", DiscoveryResources.as_view(), name="discovery-resources"),
    path(
        "internal/cog/<str:prediction_id>/<str:token>",
        CogWebhook.as_view(),
        name="cog-webhook",
    ),
]

handler400 = "x402site.errors.bad_request"
handler403 = "x402site.errors.permission_denied"
handler404 = "x402site.errors.not_found"
handler500 = "x402site.errors.server_error"
