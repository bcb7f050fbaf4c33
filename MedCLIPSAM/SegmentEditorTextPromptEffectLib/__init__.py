"""The "Text prompt" Segment Editor effect (see SegmentEditorEffect.py)."""
