"""rayedit.editing"""
