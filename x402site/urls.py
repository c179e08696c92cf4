from django.contrib import admin
from django.urls import include, path

from predictions.views import CogWebhook

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include("predictions.urls")),
    path("facilitator/", include("payments.urls")),
    path(
        "internal/cog/<str:prediction_id>/<str:token>",
        CogWebhook.as_view(),
        name="cog-webhook",
    ),
]
