"""pipeline/compare"""
