from django.urls import path

from .views import DeviceCollectionView, DeviceDetailView

urlpatterns = [
    path("devices/", DeviceCollectionView.as_view(), name="devices"),
    path("devices/<str:device_id>/", DeviceDetailView.as_view(), name="device-detail"),
]
