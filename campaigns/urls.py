from django.urls import path

from .views import ACTION_VIEWS, CampaignCollectionView, CampaignDetailView, DirectSendView

urlpatterns = [
    path("campaigns/", CampaignCollectionView.as_view(), name="campaigns"),
    path("campaigns/<int:campaign_id>/", CampaignDetailView.as_view(), name="campaign-detail"),
    *(
        path(f"campaigns/<int:campaign_id>/{action}/", view.as_view(), name=f"campaign-{action}")
        for action, view in ACTION_VIEWS.items()
    ),
    path("notifications/", DirectSendView.as_view(), name="notifications"),
]
