"""pipeline/scan"""
