"""pipeline/runner"""
