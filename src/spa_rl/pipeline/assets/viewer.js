// The trajectory viewer of report.html: pick a validation puzzle and sample, step through the turns, see the
// states with the cells the agent got wrong highlighted. Reads the episodes embedded in the page; no network.
(function(){
const data = JSON.parse(document.getElementById('episodes').textContent);
const byPuzzle = {};
data.forEach((e, i) => { (byPuzzle[e.seed] = byPuzzle[e.seed] || []).push(i); });
const puzzle = document.getElementById('puzzle'), sample = document.getElementById('sample');
const prev = document.getElementById('prev'), next = document.getElementById('next');
const pos = document.getElementById('pos'), view = document.getElementById('turn');
let episode = null, turn = 0;
const COORDS = /\b(?:is|are) (?:at|no)\b/;
function split(text){
  const rows = [], extra = [];
  (text || '').split('\n').map(l => l.trim()).filter(l => l).forEach(l => {
    if (COORDS.test(l)) { extra.push(l); return; }
    rows.push(l.indexOf(' ') >= 0 ? l.split(/\s+/) : Array.from(l));
  });
  return {rows, extra};
}
function grid(title, text, truth){
  const box = document.createElement('div'); box.className = 'state';
  const h = document.createElement('h3'); h.textContent = title; box.appendChild(h);
  if (text === null || text === undefined || text === '') {
    const p = document.createElement('div'); p.className = 'bad'; p.textContent = '(not written)'; box.appendChild(p);
    return box;
  }
  const g = split(text), t = truth === undefined ? null : split(truth);
  const table = document.createElement('table'); table.className = 'grid';
  g.rows.forEach((row, r) => {
    const tr = document.createElement('tr');
    row.forEach((cell, c) => {
      const td = document.createElement('td'); td.textContent = cell;
      if (t && (!t.rows[r] || t.rows[r][c] !== cell)) td.className = 'diff';
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  box.appendChild(table);
  g.extra.forEach(line => { const d = document.createElement('div'); d.className = 'coords'; d.textContent = line; box.appendChild(d); });
  return box;
}
function show(){
  view.innerHTML = '';
  if (!episode) return;
  const t = episode.turns[turn];
  pos.textContent = 'turn ' + (turn + 1) + ' of ' + episode.turns.length;
  prev.disabled = turn === 0; next.disabled = turn >= episode.turns.length - 1;
  const states = document.createElement('div'); states.className = 'states';
  states.appendChild(grid('shown to the agent', t.shown || t.state_before));
  states.appendChild(grid('its observation (red: differs from the truth)', t.parsed.observation, t.state_before));
  states.appendChild(grid('true state before', t.state_before));
  states.appendChild(grid('its prediction (red: differs from the truth)', t.parsed.prediction, t.state_after));
  states.appendChild(grid('true state after its actions', t.state_after));
  view.appendChild(states);
  const meta = document.createElement('div'); meta.className = 'meta';
  const acts = t.actions.length ? t.actions.join(' || ') : '(none executed)';
  meta.innerHTML = '';
  const a = document.createElement('div'); a.textContent = 'actions: ' + acts + '   reward: ' + t.reward +
    (t.parsed.format_ok ? '' : '   (format broken)'); meta.appendChild(a);
  if (turn === episode.turns.length - 1) {
    const s = document.createElement('div'); s.className = episode.success ? 'ok' : 'bad';
    s.textContent = episode.success ? 'solved' : 'not solved'; meta.appendChild(s);
  }
  view.appendChild(meta);
  const r = document.createElement('div'); r.className = 'response'; r.textContent = t.response; view.appendChild(r);
}
function pickPuzzle(){
  sample.innerHTML = '';
  (byPuzzle[puzzle.value] || []).forEach((i, k) => {
    const o = document.createElement('option'); o.value = i;
    o.textContent = 'sample ' + data[i].sample + (data[i].success ? ' (solved)' : ''); sample.appendChild(o);
  });
  pickSample();
}
function pickSample(){ episode = data[sample.value]; turn = 0; show(); }
Object.keys(byPuzzle).forEach(seed => {
  const o = document.createElement('option'); o.value = seed; o.textContent = 'puzzle ' + seed; puzzle.appendChild(o);
});
puzzle.addEventListener('change', pickPuzzle); sample.addEventListener('change', pickSample);
prev.addEventListener('click', () => { if (turn > 0) { turn--; show(); } });
next.addEventListener('click', () => { if (episode && turn < episode.turns.length - 1) { turn++; show(); } });
if (data.length) pickPuzzle(); else view.textContent = 'no evaluation episodes in this run';
})();
