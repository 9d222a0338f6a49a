"""Flower adapter: the buyer as a ServerApp, each seller as a ClientApp.

The only package of ``tip_fed`` importing ``flwr``. The protocol bytes are the same as on every
other runtime; this package only carries them in Flower records and drives the Grid.
"""
