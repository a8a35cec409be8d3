"""The app's routes, one module per group; handlers reach shared state through `request.app.state.dg`."""
