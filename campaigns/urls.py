from django.urls import path

from .views import ACTION_VIEWS, CampaignCollectionView, CampaignDetailView, DirectResultsView, DirectSendView

urlpatterns = [
    path("campaigns/", CampaignCollectionView.as_view(), name="campaigns"),
    path("campaigns/<int:campaign_id>/", CampaignDetailView.as_view(), name="campaign-detail"),
    path("campaigns/<int:campaign_id>/results/", DirectResultsView.as_view(), name="campaign-results"),
    *(
        path(f"campaigns/<int:campaign_id>/{action}/", view.as_view(), name=f"campaign-{action}")
        for action, view in ACTION_VIEWS.items()
    ),
    path("notifications/", DirectSendView.as_view(), name="notifications"),
]
