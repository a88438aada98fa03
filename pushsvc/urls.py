from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from pushsvc import health, metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("tokens.urls")),
    path("api/v1/", include("campaigns.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # Operations: probes for load balancers, Prometheus scrape (METRICS_TOKEN optional).
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]

handler404 = "pushsvc.api.not_found"
