from django.urls import path

from .views import CampaignActionView, CampaignCollectionView, CampaignDetailView, DirectSendView

urlpatterns = [
    path("campaigns/", CampaignCollectionView.as_view(), name="campaigns"),
    path("campaigns/<int:campaign_id>/", CampaignDetailView.as_view(), name="campaign-detail"),
    *(
        path(
            f"campaigns/<int:campaign_id>/{action}/",
            CampaignActionView.as_view(action=action),
            name=f"campaign-{action}",
        )
        for action in ("launch", "pause", "resume", "cancel")
    ),
    path("notifications/", DirectSendView.as_view(), name="notifications"),
]
