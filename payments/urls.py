from django.urls import path

from payments import views

urlpatterns = [
    path("verify", views.FacilitatorVerify.as_view(), name="facilitator-verify"),
    path("settle", views.FacilitatorSettle.as_view(), name="facilitator-settle"),
    path("supported", views.FacilitatorSupported.as_view(), name="facilitator-supported"),
]
