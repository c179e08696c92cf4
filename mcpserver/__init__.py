"""The MCP server (Streamable HTTP at ``/mcp``): one tool per model, paid per call with x402."""
