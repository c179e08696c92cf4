from django.urls import path

from . import views

urlpatterns = [
    path("webhooks/default/secret", views.WebhookSecret.as_view(), name="webhook-secret"),
    path("hardware", views.HardwareList.as_view(), name="hardware-list"),
    path("account", views.AccountDetail.as_view(), name="account"),
    path("collections", views.CollectionList.as_view(), name="collection-list"),
    path("collections/<str:slug>", views.CollectionDetail.as_view(), name="collection-detail"),
    path("models", views.ModelList.as_view(), name="model-list"),
    path("models/<str:owner>/<str:name>", views.ModelDetail.as_view(), name="model-detail"),
    path("models/<str:owner>/<str:name>/versions", views.ModelVersionList.as_view(), name="model-version-list"),
    path(
        "models/<str:owner>/<str:name>/versions/<str:version_id>",
        views.ModelVersionDetail.as_view(),
        name="model-version-detail",
    ),
    path("predictions", views.PredictionList.as_view(), name="prediction-create"),
    path(
        "predictions/<str:prediction_id>/cancel", views.PredictionCancel.as_view(), name="prediction-cancel"
    ),
    path("predictions/<str:prediction_id>", views.PredictionDetail.as_view(), name="prediction-detail"),
    path(
        "models/<str:owner>/<str:name>/predictions",
        views.ModelPredictionCreate.as_view(),
        name="model-prediction-create",
    ),
]
