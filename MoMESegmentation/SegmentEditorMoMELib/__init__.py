"""The MoME Segment Editor effect (registered by the MoMESegmentation module at start-up)."""
