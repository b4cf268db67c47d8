"""pipeline/release"""
