"""rayedit.evaluate"""
