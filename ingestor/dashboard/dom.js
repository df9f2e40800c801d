// Building the page: elements from a tag, attributes and children. Text is always set as
// text, never parsed as HTML, so an id or a tool name cannot inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  return render(el, ...children);
}

// Replaces what `el` holds with `children`: lists flattened, absent parts (null, false) left out.
export function render(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// A table: `columns` are {label, cell(row) -> node or text, numeric?, sort?(row) -> value}.
// With `sortable`, each header is a button that orders the rows by it (keyboard included).
export function table(columns, rows, { sortable = false, caption, key } = {}) {
  let order = { index: -1, descending: true };
  const body = h("tbody");
  const heads = columns.map((col, index) => {
    const label = sortable && col.sort
      ? h("button", { type: "button", onclick: () => sortBy(index) }, col.label)
      : col.label;
    return h("th", { scope: "col" }, label);
  });
  const render = (list) => {
    body.replaceChildren(
      ...list.map((row) => h("tr", key ? { "data-key": key(row) } : {},
        ...columns.map((col) => h("td", {}, col.cell(row))))),
    );
  };
  const sortBy = (index) => {
    const descending = order.index === index ? !order.descending : true;
    order = { index, descending };
    const value = columns[index].sort;
    const sorted = [...rows].sort((a, b) => {
      const [x, y] = [value(a), value(b)];
      const cmp = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -cmp : cmp;
    });
    heads.forEach((th, i) => {
      if (i === index) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    render(sorted);
  };
  render(rows);
  return h("div", { class: "table-wrap" },
    h("table", {}, caption ? h("caption", {}, caption) : null, h("thead", {}, h("tr", {}, heads)), body));
}
