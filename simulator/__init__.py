"""The provider simulator: a stand-in for APNs, FCM v1, HMS and Web Push over real HTTP/2 (docs/simulator.md).

A package of its own, beside the Django apps, because it plays the outside world: the gateway's
production code never imports it, and it runs without Django (`python -m simulator`).
"""
